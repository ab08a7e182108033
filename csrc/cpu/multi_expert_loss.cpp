// CPU launcher for multi_expert_loss (math: csrc/include/multi_expert_loss.h; the pass structure
// is described in guidg_fast/ops/multi_expert_loss.py).
//
// The (B, K, C) logits are never held at once: every sweep walks the classes of one expert in
// tiles of kCpuClassTile. A tile's logits are one small GEMM (a block of margin-shifted feature
// rows against the tile's rows of T_k) into a per-thread buffer, followed by row loops for the
// softmax statistics; the exp-weighted sums back onto T (o, q, dT) are GEMMs again. Tasks are
// independent (expert, row block) or (expert, class tile) pairs under one at::parallel_for, each
// writing disjoint outputs, so results do not depend on the thread count.
//   forward   rows, tasks (k, rows): online log-sum-exp -> lse, CE and, when a gradient will be
//             needed and there is no entropy term, o_bk = sum_c p_bc T_k[c] (rescaled whenever
//             the running max moves), which makes the CE backward the elementwise
//             q_bk = grad a_bk (o_bk - T_k[y_b]).
//             entropy (entropy term only), tasks (k, class tile) over all rows: p from the lse of
//             pass 1, column sums -> pbar, and sum p log p -> one partial per task.
//  backward   rows, tasks (k, rows): q_bk = sum_c dz_bc T_k[c], from o when the forward kept it,
//             else one sweep accumulating A = sum_c (a p + ew p u) T_c (and, with the entropy term,
//             O = sum_c p T_c and r = sum_c p u), q = grad (A - a T_y - ew r O). df_b = tau sum_k q_bk.
//             experts (T requires grad), tasks (k, class tile) over all rows:
//             dT_kc = tau sum_b dz_bc g_b - margin tau sum_{b: y_b = c} q_bk (the second term is the
//             path through the gathered T_k[y_b]).
// The tile GEMMs are ATen GEMMs on views of the task's buffers: the whole op is ~0.3 ms of a
// ~26 s CPU step-2 iteration, so calling the BLAS directly would not earn its keep.
// The float row loops are written so the compiler vectorises them (lane arrays for the
// reductions, a polynomial exp) and are compiled for AVX-512 / AVX2 / baseline with runtime
// selection, since the extension itself is built for the baseline ISA.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "multi_expert_loss.h"
#include "multi_expert_loss_args.h"
#include "outputs.h"

#include "cpu_isa.h"
#include "launchers.h"

namespace guidg_fast {
namespace multi_expert_loss {
namespace {

// C (M x N) = alpha op(A) op(B) + beta C on row-major buffers (leading dimensions lda, ldb, ldc),
// op(A) M x K, op(B) K x N. Called inside parallel_for tasks, where ATen runs it on this thread.
template <typename scalar_t>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, scalar_t alpha, const scalar_t* A, int64_t lda,
          const scalar_t* B, int64_t ldb, scalar_t beta, scalar_t* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto view = [&](const scalar_t* p, bool trans, int64_t rows, int64_t cols, int64_t ld) {
    at::Tensor t = at::from_blob(const_cast<scalar_t*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  };
  const at::Tensor a = view(A, trans_a, M, K, lda);
  const at::Tensor b = view(B, trans_b, K, N, ldb);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, options);
  if (beta == scalar_t(0)) {
    at::mm_out(c, a, b);
    if (alpha != scalar_t(1)) c.mul_(alpha);
  } else {
    c.addmm_(a, b, beta, alpha);
  }
}

constexpr int kLanes = 16;        // independent partial sums / maxima in the vectorised row loops

// ---------------------------------------------------------------------------------------------
// Row loops. float: vectorisable (polynomial exp, lane arrays); double: plain std:: math.

// exp(x) in float: Cody-Waite reduction to |r| <= ln2 / 2 and a degree-7 polynomial, ~2 ulp;
// 0 below -87 (where expf underflows to denormals anyway). Branch-free, so loops vectorise.
inline __attribute__((always_inline)) float exp_poly(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest integer
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.98412698e-4f;
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

// row <- tau * row; returns the max
GF_ISA_INLINE float scale_max_row_body(float* row, int64_t n, float tau) {
  float lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = -INFINITY;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = tau * row[j + l];
      row[j + l] = v;
      lanes[l] = v > lanes[l] ? v : lanes[l];
    }
  }
  float m = -INFINITY;
  for (; j < n; ++j) {
    row[j] = tau * row[j];
    m = row[j] > m ? row[j] : m;
  }
  for (int l = 0; l < kLanes; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}
GF_ISA_DISPATCH(float, scale_max_row, (float* row, int64_t n, float tau), (row, n, tau))
double scale_max_row(double* row, int64_t n, double tau) {
  double m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    row[j] = tau * row[j];
    m = std::max(m, row[j]);
  }
  return m;
}

// row <- exp(row - shift); returns the sum
GF_ISA_INLINE float exp_sum_row_body(float* row, int64_t n, float shift) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float e = exp_poly(row[j + l] - shift);
      row[j + l] = e;
      lanes[l] += e;
    }
  }
  float s = 0;
  for (; j < n; ++j) {
    row[j] = exp_poly(row[j] - shift);
    s += row[j];
  }
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}
GF_ISA_DISPATCH(float, exp_sum_row, (float* row, int64_t n, float shift), (row, n, shift))
double exp_sum_row(double* row, int64_t n, double shift) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) {
    row[j] = std::exp(row[j] - shift);
    s += row[j];
  }
  return s;
}

// row <- scale * exp(tau * row - shift): softmax probabilities (scale 1) or CE logit gradients.
// tau * row is rounded (stored) before the shift, exactly as in the forward sweep, so that e.g. a
// single class gets p = 1 exactly; a fused multiply-add here would not round it.
GF_ISA_INLINE void scaled_exp_row_body(float* row, int64_t n, float tau, float shift, float scale) {
  for (int64_t j = 0; j < n; ++j) row[j] = tau * row[j];
  for (int64_t j = 0; j < n; ++j) row[j] = scale * exp_poly(row[j] - shift);
}
GF_ISA_DISPATCH(void, scaled_exp_row, (float* row, int64_t n, float tau, float shift, float scale), (row, n, tau, shift, scale))
void scaled_exp_row(double* row, int64_t n, double tau, double shift, double scale) {
  for (int64_t j = 0; j < n; ++j) row[j] = tau * row[j];
  for (int64_t j = 0; j < n; ++j) row[j] = scale * std::exp(row[j] - shift);
}

// out <- f - margin t: the product is stored (rounded) before the subtraction, as in the reference
GF_ISA_INLINE void shift_row_body(float* __restrict__ out, const float* __restrict__ f, const float* __restrict__ t,
                                float margin, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] = margin * t[d];
  for (int64_t d = 0; d < n; ++d) out[d] = f[d] - out[d];
}
GF_ISA_DISPATCH(void, shift_row, (float* __restrict__ out, const float* __restrict__ f, const float* __restrict__ t, float margin, int64_t n), (out, f, t, margin, n))
void shift_row(double* __restrict__ out, const double* __restrict__ f, const double* __restrict__ t, double margin,
               int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] = shifted_feature<double>(f[d], t[d], margin);
}

// x <- scale * x
GF_ISA_INLINE void scale_row_body(float* __restrict__ x, float scale, int64_t n) {
  for (int64_t d = 0; d < n; ++d) x[d] *= scale;
}
GF_ISA_DISPATCH(void, scale_row, (float* __restrict__ x, float scale, int64_t n), (x, scale, n))
void scale_row(double* __restrict__ x, double scale, int64_t n) {
  for (int64_t d = 0; d < n; ++d) x[d] *= scale;
}

// out <- scale * (a - b)
GF_ISA_INLINE void scaled_difference_body(float* __restrict__ out, const float* __restrict__ a,
                                        const float* __restrict__ b, float scale, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] = scale * (a[d] - b[d]);
}
GF_ISA_DISPATCH(void, scaled_difference, (float* __restrict__ out, const float* __restrict__ a, const float* __restrict__ b, float scale, int64_t n), (out, a, b, scale, n))
void scaled_difference(double* __restrict__ out, const double* __restrict__ a, const double* __restrict__ b,
                       double scale, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] = scale * (a[d] - b[d]);
}

// ---------------------------------------------------------------------------------------------

// The value checks (ValueError in Python, worded as guidg_fast._checks words them): on the CPU they
// cost nothing here, so the eager ext path of ops.multi_expert_loss leaves them to this kernel
// instead of reading y and w through a few ATen reductions first.
void check_labels_cpu(const at::Tensor& y, int64_t C) {
  const int64_t* yp = y.data_ptr<int64_t>();
  for (int64_t b = 0; b < y.numel(); ++b) {
    TORCH_CHECK_VALUE(yp[b] >= 0 && yp[b] < C, "y must hold class indices in [0, ", C, ") (C = ", C,
                      " classes in T), got y[", b, "] = ", yp[b]);
  }
}

template <typename scalar_t>
void check_weights_finite(const at::Tensor& w) {
  const scalar_t* wp = w.data_ptr<scalar_t>();
  for (int64_t i = 0; i < w.numel(); ++i) TORCH_CHECK_VALUE(std::isfinite(wp[i]), "w contains NaN or Inf values");
}

// Below this many flops for one sweep over all logits (2 B K C D) the op runs on one thread: a
// parallel region costs more than it saves there, and on a busy machine it also waits until every
// thread of the pool gets scheduled.
constexpr double kParallelFlops = 4e6;

int64_t threads_for(int64_t B, int64_t K, int64_t C, int64_t D) {
  const double flops = 2.0 * static_cast<double>(B) * K * C * D;
  return flops < kParallelFlops ? 1 : std::max<int64_t>(1, at::get_num_threads());
}

// grain for at::parallel_for over `tasks`: all of them inline when the op runs on one thread
int64_t grain(int64_t tasks, int64_t threads) { return threads > 1 ? 1 : tasks + 1; }

// Rows per (expert, row block) task: about two tasks per thread, blocks of at most 64 rows. The
// (expert, class tile) sweeps step through the rows in the same blocks, so every pass recomputes a
// logit with the same GEMM shape and gets the same value (e.g. p = 1 exactly for a single class).
int64_t rows_per_task(int64_t B, int64_t K, int64_t threads) {
  const int64_t blocks_per_expert = std::max<int64_t>(1, (2 * threads + K - 1) / K);
  const int64_t rows = (B + blocks_per_expert - 1) / blocks_per_expert;
  return std::max<int64_t>(1, std::min<int64_t>(rows, 64));
}

// Raw views of the op's inputs.
template <typename scalar_t>
struct Inputs {
  const scalar_t* f;
  const scalar_t* T;
  const int64_t* y;
  const scalar_t* w;
  Shapes s;
  scalar_t tau, margin, entropy_weight, inv_batch;
  int64_t threads;  // threads_for(shapes), fixed per call

  const scalar_t* expert(int64_t k) const { return T + k * s.C * s.D; }
  scalar_t weight(int64_t b, int64_t k) const { return sample_weight<scalar_t>(w, s.per_sample, b, k, s.K, inv_batch); }
  // g_b = f_b - margin T_k[y_b] for rows [b0, b0 + n): f itself when the margin is 0 (as the
  // reference skips the subtraction), else written to buf (n x D)
  const scalar_t* shifted_rows(int64_t k, int64_t b0, int64_t n, scalar_t* buf) const {
    if (margin == scalar_t(0)) return f + b0 * s.D;
    const scalar_t* tk = expert(k);
    for (int64_t i = 0; i < n; ++i) shift_row(buf + i * s.D, f + (b0 + i) * s.D, tk + y[b0 + i] * s.D, margin, s.D);
    return buf;
  }
};

template <typename scalar_t>
Inputs<scalar_t> raw_inputs(const at::Tensor& f, const at::Tensor& T, const at::Tensor& y, const at::Tensor& w,
                            const Shapes& s, double tau, double margin, double entropy_weight) {
  return {f.data_ptr<scalar_t>(), T.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), w.data_ptr<scalar_t>(), s,
          static_cast<scalar_t>(tau), static_cast<scalar_t>(margin), static_cast<scalar_t>(entropy_weight),
          scalar_t(1) / static_cast<scalar_t>(s.B), threads_for(s.B, s.K, s.C, s.D)};
}

// Rows [b0, b0 + n) of expert k (g: their possibly margin-shifted features) against classes
// [c_begin, c_end) in class tiles: every row's online LSE state, target[i] = its target logit where
// y falls in the range (untouched otherwise), and with acc_o the exp-weighted sum of the class
// features relative to the running max.
template <typename scalar_t>
void sweep_classes(const Inputs<scalar_t>& in, int64_t k, int64_t b0, int64_t n, const scalar_t* g, int64_t c_begin,
                   int64_t c_end, OnlineLse<scalar_t>* state, scalar_t* target, scalar_t* z, scalar_t* acc_o) {
  using acc_t = scalar_t;
  const Shapes& s = in.s;
  const scalar_t* tk = in.expert(k);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kCpuClassTile) {
    const int64_t ct = std::min<int64_t>(kCpuClassTile, c_end - c0);
    const scalar_t* tile = tk + c0 * s.D;
    gemm<scalar_t>(false, true, n, ct, s.D, 1, g, s.D, tile, s.D, 0, z, ct);  // z = g tile^T
    for (int64_t i = 0; i < n; ++i) {
      scalar_t* row = z + i * ct;
      const acc_t tile_max = scale_max_row(row, ct, in.tau);
      const int64_t yi = in.y[b0 + i] - c0;
      if (yi >= 0 && yi < ct) target[i] = row[yi];
      const acc_t alpha = state[i].rescale(tile_max);
      state[i].sum += exp_sum_row(row, ct, static_cast<scalar_t>(state[i].max));  // row <- exp(z - max)
      if (acc_o != nullptr && c0 > c_begin && alpha != acc_t(1)) scale_row(acc_o + i * s.D, alpha, s.D);
    }
    if (acc_o != nullptr) gemm<scalar_t>(false, false, n, s.D, ct, 1, z, ct, tile, s.D, 1, acc_o, s.D);
  }
}

template <typename scalar_t>
void forward_rows(const Inputs<scalar_t>& in, bool need_o, scalar_t* lse, scalar_t* ce, scalar_t* o) {
  using acc_t = scalar_t;
  const Shapes& s = in.s;
  const int64_t rows = rows_per_task(s.B, s.K, in.threads);
  const int64_t row_blocks = (s.B + rows - 1) / rows;
  const int64_t ct_max = std::min<int64_t>(kCpuClassTile, s.C);
  at::parallel_for(0, s.K * row_blocks, grain(s.K * row_blocks, in.threads), [&](int64_t lo, int64_t hi) {
    std::vector<OnlineLse<acc_t>> state(rows);
    std::vector<acc_t> target(rows);
    std::vector<scalar_t> gbuf(in.margin != scalar_t(0) ? rows * s.D : 0);
    std::vector<scalar_t> z(rows * ct_max);
    std::vector<scalar_t> acc_o(need_o ? rows * s.D : 0);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t k = task / row_blocks;
      const int64_t b0 = (task % row_blocks) * rows;
      const int64_t n = std::min(rows, s.B - b0);
      const scalar_t* g = in.shifted_rows(k, b0, n, gbuf.data());
      std::fill(acc_o.begin(), acc_o.end(), scalar_t(0));
      for (int64_t i = 0; i < n; ++i) {
        state[i].init();
        target[i] = acc_t(0);
      }
      sweep_classes<scalar_t>(in, k, b0, n, g, 0, s.C, state.data(), target.data(), z.data(),
                              need_o ? acc_o.data() : nullptr);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t bk = (b0 + i) * s.K + k;
        const acc_t l = state[i].lse();
        lse[bk] = l;
        ce[bk] = l - target[i];
        if (need_o) {
          scalar_t* dst = o + bk * s.D;
          std::copy(acc_o.data() + i * s.D, acc_o.data() + (i + 1) * s.D, dst);
          scale_row(dst, acc_t(1) / state[i].sum, s.D);
        }
      }
    }
  });
}

// The CE-only forward that also keeps o, for many classes (the training step's case: the backward
// then needs no class sweep, so its logits need not match these GEMM shapes). Tasks are (expert,
// row block, class split) with up to 64 rows per GEMM: each split of T_k streams through the cache
// once, where forward_rows's (expert, row block) tasks read all of T_k once per row block with
// GEMMs of half the rows. The splits' (max, sum, target, o) partials merge by their maxima.
template <typename scalar_t>
void forward_rows_split(const Inputs<scalar_t>& in, scalar_t* lse, scalar_t* ce, scalar_t* o) {
  using acc_t = scalar_t;
  const Shapes& s = in.s;
  const int64_t rows = std::min<int64_t>(s.B, 64);
  const int64_t row_blocks = (s.B + rows - 1) / rows;
  const int64_t base_tasks = s.K * row_blocks;
  // about two tasks per thread, at least 32 classes per split
  const int64_t splits = std::max<int64_t>(
      1, std::min<int64_t>((2 * in.threads + base_tasks - 1) / base_tasks, s.C / 32));
  const int64_t per_split = (s.C + splits - 1) / splits;
  const int64_t BK = s.B * s.K;
  std::vector<acc_t> pmax(splits * BK), psum(splits * BK), ptarget(splits * BK);
  std::vector<scalar_t> po(splits * BK * s.D);
  const int64_t ct_max = std::min<int64_t>(kCpuClassTile, per_split);
  at::parallel_for(0, base_tasks * splits, grain(base_tasks * splits, in.threads), [&](int64_t lo, int64_t hi) {
    std::vector<OnlineLse<acc_t>> state(rows);
    std::vector<acc_t> target(rows);
    std::vector<scalar_t> gbuf(in.margin != scalar_t(0) ? rows * s.D : 0);
    std::vector<scalar_t> z(rows * ct_max);
    std::vector<scalar_t> acc_o(rows * s.D);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t sp = task % splits, kb = task / splits;
      const int64_t k = kb / row_blocks;
      const int64_t b0 = (kb % row_blocks) * rows;
      const int64_t n = std::min(rows, s.B - b0);
      const int64_t cs = sp * per_split, cend = std::min(s.C, cs + per_split);
      const scalar_t* g = in.shifted_rows(k, b0, n, gbuf.data());
      std::fill(acc_o.begin(), acc_o.begin() + n * s.D, scalar_t(0));
      for (int64_t i = 0; i < n; ++i) {
        state[i].init();
        target[i] = acc_t(0);  // stays 0 where y falls in another split: the merge sums the splits'
      }
      sweep_classes<scalar_t>(in, k, b0, n, g, cs, cend, state.data(), target.data(), z.data(), acc_o.data());
      for (int64_t i = 0; i < n; ++i) {
        const int64_t idx = sp * BK + (b0 + i) * s.K + k;
        ptarget[idx] = target[i];
        pmax[idx] = state[i].max;
        psum[idx] = state[i].sum;
        std::copy(acc_o.data() + i * s.D, acc_o.data() + (i + 1) * s.D, po.data() + idx * s.D);
      }
    }
  });
  // merge the splits of every (sample, expert) row
  at::parallel_for(0, BK, grain(BK, BK * s.D * splits > (1 << 16) ? in.threads : 1), [&](int64_t lo, int64_t hi) {
    for (int64_t bk = lo; bk < hi; ++bk) {
      acc_t m = pmax[bk];
      for (int64_t sp = 1; sp < splits; ++sp) m = std::max(m, pmax[sp * BK + bk]);
      acc_t total = 0, target = 0;
      for (int64_t sp = 0; sp < splits; ++sp) {
        total += psum[sp * BK + bk] * std::exp(pmax[sp * BK + bk] - m);
        target += ptarget[sp * BK + bk];
      }
      const acc_t l = m + std::log(total);
      lse[bk] = l;
      ce[bk] = l - target;
      scalar_t* dst = o + bk * s.D;
      for (int64_t sp = 0; sp < splits; ++sp) {
        const scalar_t w = static_cast<scalar_t>(std::exp(pmax[sp * BK + bk] - m) / total);
        const scalar_t* src = po.data() + (sp * BK + bk) * s.D;
        if (sp == 0) {
          for (int64_t d = 0; d < s.D; ++d) dst[d] = w * src[d];
        } else {
          for (int64_t d = 0; d < s.D; ++d) dst[d] += w * src[d];
        }
      }
    }
  });
}

// Entropy pass: pbar (K, C) and one partial sum of [mean_b H(p_b) - H(pbar)] per (k, class tile).
template <typename scalar_t>
void forward_entropy(const Inputs<scalar_t>& in, const scalar_t* lse, scalar_t* pbar, std::vector<scalar_t>& partial) {
  using acc_t = scalar_t;
  const Shapes& s = in.s;
  const int64_t tiles = (s.C + kCpuClassTile - 1) / kCpuClassTile;
  const int64_t rows_max = rows_per_task(s.B, s.K, in.threads);
  const int64_t ct_max = std::min<int64_t>(kCpuClassTile, s.C);
  partial.assign(s.K * tiles, scalar_t(0));
  at::parallel_for(0, s.K * tiles, grain(s.K * tiles, in.threads), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> colsum(ct_max);
    std::vector<scalar_t> gbuf(in.margin != scalar_t(0) ? rows_max * s.D : 0);
    std::vector<scalar_t> z(rows_max * ct_max);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t k = task / tiles;
      const int64_t c0 = (task % tiles) * kCpuClassTile;
      const int64_t ct = std::min<int64_t>(kCpuClassTile, s.C - c0);
      const scalar_t* tile = in.expert(k) + c0 * s.D;
      std::fill(colsum.begin(), colsum.end(), acc_t(0));
      acc_t row_entropy = 0;
      for (int64_t b0 = 0; b0 < s.B; b0 += rows_max) {
        const int64_t n = std::min(rows_max, s.B - b0);
        const scalar_t* g = in.shifted_rows(k, b0, n, gbuf.data());
        gemm<scalar_t>(false, true, n, ct, s.D, 1, g, s.D, tile, s.D, 0, z.data(), ct);
        for (int64_t i = 0; i < n; ++i) {
          scalar_t* row = z.data() + i * ct;
          scaled_exp_row(row, ct, in.tau, lse[(b0 + i) * s.K + k], scalar_t(1));  // p
          for (int64_t j = 0; j < ct; ++j) {
            colsum[j] += row[j];
            row_entropy += entropy_term<acc_t>(row[j]);
          }
        }
      }
      acc_t mean_entropy = 0;
      for (int64_t j = 0; j < ct; ++j) {
        const acc_t pb = colsum[j] * in.inv_batch;
        pbar[k * s.C + c0 + j] = pb;
        mean_entropy += entropy_term(pb);
      }
      partial[task] = row_entropy * in.inv_batch - mean_entropy;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_expert_loss_forward_cpu(
    const at::Tensor& f, const at::Tensor& T, const at::Tensor& y, const at::Tensor& w, double temperature,
    double margin, double entropy_weight, bool need_o) {
  const Shapes s = check_inputs(f, T, y, w);  // shared with the CUDA launcher
  check_labels_cpu(y, s.C);
  TORCH_CHECK(temperature > 0, "temperature must be positive, got ", temperature);
  const auto options = f.options();
  const bool entropy = entropy_weight != 0.0;
  need_o = need_o && !entropy;  // with the entropy term the backward sweeps the classes itself
  at::Tensor loss = new_output({}, options);
  at::Tensor lse = new_output({s.B, s.K}, options);
  at::Tensor ce = new_output({s.B, s.K}, options);
  at::Tensor o = need_o ? new_output({s.B, s.K, s.D}, options) : at::empty({0}, options);
  at::Tensor pbar = entropy ? new_output({s.K, s.C}, options) : at::empty({0}, options);
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "multi_expert_loss_forward_cpu", [&] {
    using acc_t = scalar_t;
    check_weights_finite<scalar_t>(w);
    const auto in = raw_inputs<scalar_t>(f, T, y, w, s, temperature, margin, entropy_weight);
    // one expert's features above 1 MB: the class-split tasks read them once (C = 1000, D = 512:
    // 1.22 -> 1.05 ms here); below, T stays in cache across row blocks and forward_rows's fewer,
    // longer sweeps win (C = 200: 0.26-0.31 vs 0.33 ms)
    if (need_o && s.C * s.D * static_cast<int64_t>(sizeof(scalar_t)) > (int64_t(1) << 20)) {
      forward_rows_split<scalar_t>(in, lse.data_ptr<scalar_t>(), ce.data_ptr<scalar_t>(), o.data_ptr<scalar_t>());
    } else {
      forward_rows<scalar_t>(in, need_o, lse.data_ptr<scalar_t>(), ce.data_ptr<scalar_t>(),
                             need_o ? o.data_ptr<scalar_t>() : nullptr);
    }
    const scalar_t* cep = ce.data_ptr<scalar_t>();
    acc_t total = 0;
    for (int64_t k = 0; k < s.K; ++k) {
      for (int64_t b = 0; b < s.B; ++b) total += in.weight(b, k) * cep[b * s.K + k];
    }
    if (entropy) {
      std::vector<scalar_t> partial;
      forward_entropy<scalar_t>(in, lse.data_ptr<scalar_t>(), pbar.data_ptr<scalar_t>(), partial);
      acc_t ent = 0;
      for (const scalar_t v : partial) ent += v;
      total += in.entropy_weight * ent;
    }
    *loss.data_ptr<scalar_t>() = total;
  });
  return {loss, lse, ce, o, pbar};
}

namespace {

template <typename scalar_t>
void backward_rows(const Inputs<scalar_t>& in, scalar_t grad, const scalar_t* lse, const scalar_t* o,
                   const scalar_t* pbar_grad, scalar_t* q, scalar_t* r) {
  using acc_t = scalar_t;
  const Shapes& s = in.s;
  const bool entropy = in.entropy_weight != scalar_t(0);
  const bool sweep = entropy || o == nullptr;  // o is only kept by the forward for CE-only losses
  const int64_t acc_rows = entropy ? 2 : 1;    // A, and O for the entropy term
  const int64_t rows = rows_per_task(s.B, s.K, in.threads);
  const int64_t row_blocks = (s.B + rows - 1) / rows;
  const int64_t ct_max = std::min<int64_t>(kCpuClassTile, s.C);
  at::parallel_for(0, s.K * row_blocks, grain(s.K * row_blocks, in.threads), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> pu_sum(rows);
    std::vector<scalar_t> gbuf(sweep && in.margin != scalar_t(0) ? rows * s.D : 0);
    std::vector<scalar_t> z(sweep ? rows * ct_max : 0);
    std::vector<scalar_t> coef(sweep ? acc_rows * rows * ct_max : 0);
    std::vector<scalar_t> acc(sweep ? acc_rows * rows * s.D : 0);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t k = task / row_blocks;
      const int64_t b0 = (task % row_blocks) * rows;
      const int64_t n = std::min(rows, s.B - b0);
      const scalar_t* tk = in.expert(k);
      if (!sweep) {
        // CE only: sum_c dz_bc T_c = grad a (o_bk - T_k[y_b]), o from the forward sweep
        for (int64_t i = 0; i < n; ++i) {
          const int64_t b = b0 + i;
          const int64_t bk = b * s.K + k;
          scaled_difference(q + bk * s.D, o + bk * s.D, tk + in.y[b] * s.D, grad * in.weight(b, k), s.D);
        }
        continue;
      }
      const scalar_t* g = in.shifted_rows(k, b0, n, gbuf.data());
      // rows [0, n): A = sum_c (a p + ew p u) T_c; rows [n, 2n) (entropy only): O = sum_c p T_c
      std::fill(acc.begin(), acc.begin() + acc_rows * n * s.D, scalar_t(0));
      std::fill(pu_sum.begin(), pu_sum.end(), acc_t(0));
      for (int64_t c0 = 0; c0 < s.C; c0 += kCpuClassTile) {
        const int64_t ct = std::min<int64_t>(kCpuClassTile, s.C - c0);
        const scalar_t* tile = tk + c0 * s.D;
        gemm<scalar_t>(false, true, n, ct, s.D, 1, g, s.D, tile, s.D, 0, z.data(), ct);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t bk = (b0 + i) * s.K + k;
          const acc_t a = in.weight(b0 + i, k);
          scalar_t* p = z.data() + i * ct;
          if (!entropy) {
            scaled_exp_row(p, ct, in.tau, lse[bk], a);  // a p
            std::copy(p, p + ct, coef.data() + i * ct);
            continue;
          }
          scaled_exp_row(p, ct, in.tau, lse[bk], scalar_t(1));
          for (int64_t j = 0; j < ct; ++j) {
            const acc_t pu = p[j] * entropy_prob_grad<acc_t>(p[j], pbar_grad[k * s.C + c0 + j], in.inv_batch);
            pu_sum[i] += pu;
            coef[i * ct + j] = a * p[j] + in.entropy_weight * pu;
            coef[(n + i) * ct + j] = p[j];
          }
        }
        gemm<scalar_t>(false, false, acc_rows * n, s.D, ct, 1, coef.data(), ct, tile, s.D, 1, acc.data(), s.D);
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t bk = (b0 + i) * s.K + k;
        const scalar_t* ty = tk + in.y[b0 + i] * s.D;
        const scalar_t* acc_a = acc.data() + i * s.D;
        scalar_t* qb = q + bk * s.D;
        const acc_t a = in.weight(b0 + i, k);
        if (!entropy) {
          for (int64_t d = 0; d < s.D; ++d) qb[d] = grad * (acc_a[d] - a * ty[d]);
          continue;
        }
        const scalar_t* acc_p = acc.data() + (n + i) * s.D;
        const acc_t ew_r = in.entropy_weight * pu_sum[i];
        for (int64_t d = 0; d < s.D; ++d) qb[d] = grad * (acc_a[d] - a * ty[d] - ew_r * acc_p[d]);
        if (r != nullptr) r[bk] = pu_sum[i];
      }
    }
  });
}

template <typename scalar_t>
void backward_experts(const Inputs<scalar_t>& in, scalar_t grad, const scalar_t* lse, const scalar_t* pbar_grad,
                      const scalar_t* q, const scalar_t* r, scalar_t* dT) {
  using acc_t = scalar_t;
  const Shapes& s = in.s;
  const bool entropy = in.entropy_weight != scalar_t(0);
  const int64_t tiles = (s.C + kCpuClassTile - 1) / kCpuClassTile;
  const int64_t rows_max = rows_per_task(s.B, s.K, in.threads);
  const int64_t ct_max = std::min<int64_t>(kCpuClassTile, s.C);
  at::parallel_for(0, s.K * tiles, grain(s.K * tiles, in.threads), [&](int64_t lo, int64_t hi) {
    std::vector<scalar_t> gbuf(in.margin != scalar_t(0) ? rows_max * s.D : 0);
    std::vector<scalar_t> z(rows_max * ct_max);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t k = task / tiles;
      const int64_t c0 = (task % tiles) * kCpuClassTile;
      const int64_t ct = std::min<int64_t>(kCpuClassTile, s.C - c0);
      const scalar_t* tile = in.expert(k) + c0 * s.D;
      scalar_t* out = dT + (k * s.C + c0) * s.D;  // rows c0 .. c0 + ct of dT_k
      std::fill(out, out + ct * s.D, scalar_t(0));
      for (int64_t b0 = 0; b0 < s.B; b0 += rows_max) {
        const int64_t n = std::min(rows_max, s.B - b0);
        const scalar_t* g = in.shifted_rows(k, b0, n, gbuf.data());
        gemm<scalar_t>(false, true, n, ct, s.D, 1, g, s.D, tile, s.D, 0, z.data(), ct);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t b = b0 + i;
          const int64_t bk = b * s.K + k;
          const acc_t a = in.weight(b, k);
          scalar_t* dz = z.data() + i * ct;  // logits -> dz in place
          const int64_t yi = in.y[b] - c0;
          if (!entropy) {
            scaled_exp_row(dz, ct, in.tau, lse[bk], grad * a);  // grad a p
            if (yi >= 0 && yi < ct) dz[yi] -= grad * a;
            continue;
          }
          scaled_exp_row(dz, ct, in.tau, lse[bk], scalar_t(1));
          for (int64_t j = 0; j < ct; ++j) {
            const acc_t p = dz[j];
            const acc_t u = entropy_prob_grad<acc_t>(p, pbar_grad[k * s.C + c0 + j], in.inv_batch);
            dz[j] = grad * logit_grad<acc_t>(a, p, j == yi, in.entropy_weight, u, r[bk]);
          }
        }
        // out (ct x D) += tau dz^T (ct x n) g (n x D)
        gemm<scalar_t>(true, false, ct, s.D, n, in.tau, z.data(), ct, g, s.D, 1, out, s.D);
        if (in.margin != scalar_t(0)) {
          // the path through the gathered T_k[y_b]: d/dT_k[y_b] of -margin tau T_k[y_b] . sum_c dz_bc T_c
          const acc_t scale = in.margin * in.tau;
          for (int64_t i = 0; i < n; ++i) {
            const int64_t b = b0 + i;
            const int64_t j = in.y[b] - c0;
            if (j < 0 || j >= ct) continue;
            const scalar_t* qb = q + (b * s.K + k) * s.D;
            scalar_t* orow = out + j * s.D;
            for (int64_t d = 0; d < s.D; ++d) orow[d] -= scale * qb[d];
          }
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_expert_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& f, const at::Tensor& T, const at::Tensor& y, const at::Tensor& w,
    const at::Tensor& lse, const at::Tensor& ce, const at::Tensor& o, const at::Tensor& pbar, double temperature,
    double margin, double entropy_weight, bool need_f, bool need_T, bool need_w) {
  const Shapes s = check_inputs(f, T, y, w);  // shared with the CUDA launcher
  check_labels_cpu(y, s.C);
  const bool entropy = entropy_weight != 0.0;
  TORCH_CHECK(grad.numel() == 1 && grad.device().is_cpu(), "grad must hold one value on the CPU, got shape ",
              grad.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({s.B, s.K}) && ce.sizes() == at::IntArrayRef({s.B, s.K}) &&
                  lse.is_contiguous() && ce.is_contiguous() && lse.scalar_type() == f.scalar_type() &&
                  ce.scalar_type() == f.scalar_type(),
              "lse and ce must be contiguous (B, K) = (", s.B, ", ", s.K, ") tensors of f's dtype");
  // q (and r) per row: for df, for the margin path of dT, and r for the entropy part of dT
  const bool need_rows = need_f || (need_T && (margin != 0.0 || entropy));
  // o from the forward (CE only) saves the backward a class sweep; empty: the backward sweeps
  const bool have_o = !entropy && o.numel() > 0;
  if (have_o) {
    TORCH_CHECK(o.sizes() == at::IntArrayRef({s.B, s.K, s.D}) && o.is_contiguous() && o.scalar_type() == f.scalar_type(),
                "o must be empty or the (B, K, D) softmax-weighted expert features of the forward pass, got shape ",
                o.sizes());
  }
  if (entropy) {
    TORCH_CHECK(pbar.sizes() == at::IntArrayRef({s.K, s.C}) && pbar.is_contiguous() &&
                    pbar.scalar_type() == f.scalar_type(),
                "pbar must have shape (K, C) = (", s.K, ", ", s.C, ") when entropy_weight != 0, got ", pbar.sizes());
  }
  const auto options = f.options();
  at::Tensor df = need_f ? new_output({s.B, s.D}, options) : at::empty({0}, options);
  at::Tensor dT = need_T ? new_output({s.K, s.C, s.D}, options) : at::empty({0}, options);
  at::Tensor dw = need_w ? new_output(w.sizes(), options) : at::empty({0}, options);
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "multi_expert_loss_backward_cpu", [&] {
    using acc_t = scalar_t;
    const scalar_t g = grad.to(f.scalar_type()).item<scalar_t>();
    const auto in = raw_inputs<scalar_t>(f, T, y, w, s, temperature, margin, entropy_weight);
    std::vector<scalar_t> pbar_grad;  // h'(pbar_kc), once per class
    if (entropy && (need_rows || need_T)) {
      const scalar_t* pb = pbar.data_ptr<scalar_t>();
      pbar_grad.resize(s.K * s.C);
      for (int64_t i = 0; i < s.K * s.C; ++i) pbar_grad[i] = entropy_term_grad<acc_t>(pb[i]);
    }
    std::vector<scalar_t> q, r;
    if (need_rows) {
      q.resize(s.B * s.K * s.D);
      if (entropy && need_T) r.resize(s.B * s.K);
      backward_rows<scalar_t>(in, g, lse.data_ptr<scalar_t>(), have_o ? o.data_ptr<scalar_t>() : nullptr,
                              pbar_grad.data(), q.data(), r.empty() ? nullptr : r.data());
    }
    if (need_f) {
      scalar_t* dfp = df.data_ptr<scalar_t>();
      at::parallel_for(0, s.B, grain(s.B, s.B * s.K * s.D > (1 << 20) ? in.threads : 1), [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) {
          scalar_t* out = dfp + b * s.D;
          const scalar_t* qb = q.data() + b * s.K * s.D;
          for (int64_t d = 0; d < s.D; ++d) out[d] = qb[d];
          for (int64_t k = 1; k < s.K; ++k) {
            for (int64_t d = 0; d < s.D; ++d) out[d] += qb[k * s.D + d];
          }
          for (int64_t d = 0; d < s.D; ++d) out[d] *= in.tau;
        }
      });
    }
    if (need_w) {
      const scalar_t* cep = ce.data_ptr<scalar_t>();
      scalar_t* dwp = dw.data_ptr<scalar_t>();
      if (s.per_sample) {
        for (int64_t i = 0; i < s.B * s.K; ++i) dwp[i] = g * cep[i] * in.inv_batch;
      } else {
        for (int64_t k = 0; k < s.K; ++k) {
          acc_t sum = 0;
          for (int64_t b = 0; b < s.B; ++b) sum += cep[b * s.K + k];
          dwp[k] = g * sum * in.inv_batch;
        }
      }
    }
    if (need_T) {
      backward_experts<scalar_t>(in, g, lse.data_ptr<scalar_t>(), pbar_grad.data(), q.empty() ? nullptr : q.data(),
                                 r.empty() ? nullptr : r.data(), dT.data_ptr<scalar_t>());
    }
  });
  return {df, dT, dw};
}

}  // namespace multi_expert_loss

}  // namespace guidg_fast
