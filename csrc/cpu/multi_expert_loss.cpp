// CPU launcher for multi_expert_loss (math: csrc/include/multi_expert_loss.h).
//
// The (B, K, C) logits are never held at once: every sweep walks the classes of one expert in
// tiles of kCpuClassTile, each tile a small GEMM (at::mm, i.e. the BLAS torch links) of a block of
// margin-shifted features against the tile's rows of T_k, followed by scalar loops for the softmax
// statistics. Tasks are independent (expert, row block) or (expert, class tile) pairs under one
// at::parallel_for, each writing disjoint outputs, so results do not depend on the thread count.
//   forward  pass 1, tasks (k, rows): online log-sum-exp -> lse, CE and, when a gradient will be
//            needed and there is no entropy term, o_bk = sum_c p_bc T_k[c] accumulated flash-style
//            (rescaled whenever the running max moves), which makes the CE backward a pure
//            elementwise step: q_bk = grad a_bk (o_bk - T_k[y_b]).
//            pass 2 (entropy term only), tasks (k, class tile) over all rows: p from the lse of
//            pass 1, per-class column sums -> pbar, and sum p log p -> one partial per task.
//  backward  rows, tasks (k, rows): q_bk = sum_c dz_bc T_k[c]; with the entropy term one sweep
//            accumulates A = sum_c (a p + ew p u) T_c, O = sum_c p T_c and r = sum_c p u, then
//            q = grad (A - a T_y - ew r O). df_b = tau sum_k q_bk.
//            expert gradient (T requires grad), tasks (k, class tile) over all rows:
//            dT_kc = tau sum_b dz_bc g_b - margin tau sum_{b: y_b = c} q_bk (the second term is
//            the path through the gathered T_k[y_b]).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "multi_expert_loss.h"

namespace guidg_fast {
namespace multi_expert_loss {
namespace {

constexpr int64_t kRowTile = 64;  // rows per GEMM in the (expert, class tile) sweeps

bool poison_outputs() {
  const char* v = std::getenv("GUIDG_FAST_POISON");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// Outputs are filled with NaN under GUIDG_FAST_POISON=1, so a test sees any element a kernel skips.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (poison_outputs()) return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  return at::empty(sizes, options);
}

struct Shapes {
  int64_t B, K, C, D;
  bool per_sample;
};

Shapes check_inputs(const at::Tensor& f, const at::Tensor& T, const at::Tensor& y, const at::Tensor& w) {
  GF_CHECK_DIM(f, 2, "f");
  GF_CHECK_DIM(T, 3, "T");
  GF_CHECK_DIM(y, 1, "y");
  TORCH_CHECK(w.dim() == 1 || w.dim() == 2, "w must be 1-D (K,) or 2-D (B, K), got shape ", w.sizes());
  GF_CHECK_CONTIGUOUS(f, "f");
  GF_CHECK_CONTIGUOUS(T, "T");
  GF_CHECK_CONTIGUOUS(y, "y");
  GF_CHECK_CONTIGUOUS(w, "w");
  GF_CHECK_FLOATING(f, "f");
  TORCH_CHECK(T.scalar_type() == f.scalar_type() && w.scalar_type() == f.scalar_type(),
              "T and w must have f's dtype ", f.scalar_type(), ", got ", T.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(y.scalar_type() == at::kLong, "y must be int64, got ", y.scalar_type());
  GF_CHECK_SAME_DEVICE(T, f, "T", "f");
  GF_CHECK_SAME_DEVICE(y, f, "y", "f");
  GF_CHECK_SAME_DEVICE(w, f, "w", "f");
  Shapes s{f.size(0), T.size(0), T.size(1), f.size(1), w.dim() == 2};
  TORCH_CHECK(T.size(2) == s.D, "T must have shape (K, C, ", s.D, "), got ", T.sizes());
  TORCH_CHECK(s.B > 0 && s.K > 0 && s.C > 0 && s.D > 0, "f and T must be non-empty, got ", f.sizes(), " and ", T.sizes());
  TORCH_CHECK(y.size(0) == s.B, "y must have shape (", s.B, ",), got ", y.sizes());
  if (s.per_sample) {
    TORCH_CHECK(w.size(0) == s.B && w.size(1) == s.K, "w (per-sample weights) must have shape (", s.B, ", ", s.K,
                "), got ", w.sizes());
  } else {
    TORCH_CHECK(w.size(0) == s.K, "w (batch weights) must have shape (", s.K, ",), got ", w.sizes());
  }
  return s;
}

void check_labels_cpu(const at::Tensor& y, int64_t C) {
  const int64_t* yp = y.data_ptr<int64_t>();
  for (int64_t b = 0; b < y.numel(); ++b) {
    TORCH_CHECK(yp[b] >= 0 && yp[b] < C, "y must hold class indices in [0, ", C, "), got y[", b, "] = ", yp[b]);
  }
}

// Rows per (expert, row block) task: enough tasks to occupy every thread a few times over, but
// blocks tall enough that each class tile stays a real GEMM.
int64_t rows_per_task(int64_t B, int64_t K) {
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t blocks_per_expert = std::max<int64_t>(1, (want + K - 1) / K);
  const int64_t rows = (B + blocks_per_expert - 1) / blocks_per_expert;
  return std::min<int64_t>(B, std::max<int64_t>(std::min<int64_t>(rows, 64), 8));
}

// g_b = f_b - margin T_k[y_b] for rows [b0, b0 + n) of expert k, as an (n, D) tensor (a view of f
// when the margin is 0, exactly as the reference skips the subtraction).
template <typename scalar_t>
at::Tensor shifted_rows(const at::Tensor& f, const at::Tensor& T, const int64_t* y, int64_t k, int64_t b0, int64_t n,
                        scalar_t margin) {
  if (margin == scalar_t(0)) return f.narrow(0, b0, n);
  const int64_t C = T.size(1), D = T.size(2);
  at::Tensor g = at::empty({n, D}, f.options());
  scalar_t* gp = g.data_ptr<scalar_t>();
  const scalar_t* fp = f.data_ptr<scalar_t>() + b0 * D;
  const scalar_t* tk = T.data_ptr<scalar_t>() + k * C * D;
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* ty = tk + y[b0 + i] * D;
    for (int64_t d = 0; d < D; ++d) gp[i * D + d] = shifted_feature<scalar_t>(fp[i * D + d], ty[d], margin);
  }
  return g;
}

template <typename scalar_t>
void forward_rows(const at::Tensor& f, const at::Tensor& T, const int64_t* y, const Shapes& s, scalar_t tau,
                  scalar_t margin, bool need_o, scalar_t* lse, scalar_t* ce, scalar_t* o) {
  using acc_t = scalar_t;
  const int64_t rows = rows_per_task(s.B, s.K);
  const int64_t row_blocks = (s.B + rows - 1) / rows;
  at::parallel_for(0, s.K * row_blocks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<OnlineLse<acc_t>> state(rows);
    std::vector<acc_t> target(rows);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t k = task / row_blocks;
      const int64_t b0 = (task % row_blocks) * rows;
      const int64_t n = std::min(rows, s.B - b0);
      const at::Tensor g = shifted_rows<scalar_t>(f, T, y, k, b0, n, margin);
      const at::Tensor tk = T.select(0, k);
      at::Tensor acc_o = need_o ? at::zeros({n, s.D}, f.options()) : at::Tensor();
      scalar_t* op = need_o ? acc_o.data_ptr<scalar_t>() : nullptr;
      for (int64_t i = 0; i < n; ++i) {
        state[i].init();
        target[i] = acc_t(0);
      }
      for (int64_t c0 = 0; c0 < s.C; c0 += kCpuClassTile) {
        const int64_t ct = std::min<int64_t>(kCpuClassTile, s.C - c0);
        const at::Tensor tile = tk.narrow(0, c0, ct);
        at::Tensor z = at::mm(g, tile.t());  // (n, ct), becomes exp(z - max) in place
        scalar_t* zp = z.data_ptr<scalar_t>();
        for (int64_t i = 0; i < n; ++i) {
          scalar_t* row = zp + i * ct;
          acc_t tile_max = static_cast<acc_t>(-INFINITY);
          for (int64_t j = 0; j < ct; ++j) {
            row[j] = tau * row[j];
            tile_max = std::max<acc_t>(tile_max, row[j]);
          }
          const int64_t yi = y[b0 + i] - c0;
          if (yi >= 0 && yi < ct) target[i] = row[yi];
          const acc_t alpha = state[i].rescale(tile_max);
          for (int64_t j = 0; j < ct; ++j) row[j] = state[i].push(row[j]);
          if (need_o && alpha != acc_t(1)) {
            for (int64_t d = 0; d < s.D; ++d) op[i * s.D + d] *= alpha;
          }
        }
        if (need_o) acc_o.addmm_(z, tile);
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = b0 + i;
        lse[b * s.K + k] = state[i].lse();
        ce[b * s.K + k] = state[i].lse() - target[i];
        if (need_o) {
          const acc_t inv_sum = acc_t(1) / state[i].sum;
          scalar_t* dst = o + (b * s.K + k) * s.D;
          for (int64_t d = 0; d < s.D; ++d) dst[d] = op[i * s.D + d] * inv_sum;
        }
      }
    }
  });
}

// Entropy pass: pbar (K, C) and one partial sum of [mean_b H(p_b) - H(pbar)] per (k, class tile).
template <typename scalar_t>
void forward_entropy(const at::Tensor& f, const at::Tensor& T, const int64_t* y, const Shapes& s, scalar_t tau,
                     scalar_t margin, const scalar_t* lse, scalar_t* pbar, std::vector<scalar_t>& partial) {
  using acc_t = scalar_t;
  const int64_t tiles = (s.C + kCpuClassTile - 1) / kCpuClassTile;
  partial.assign(s.K * tiles, scalar_t(0));
  const acc_t inv_batch = acc_t(1) / static_cast<acc_t>(s.B);
  at::parallel_for(0, s.K * tiles, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> colsum(kCpuClassTile);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t k = task / tiles;
      const int64_t c0 = (task % tiles) * kCpuClassTile;
      const int64_t ct = std::min<int64_t>(kCpuClassTile, s.C - c0);
      const at::Tensor tile = T.select(0, k).narrow(0, c0, ct);
      std::fill(colsum.begin(), colsum.end(), acc_t(0));
      acc_t row_entropy = 0;
      for (int64_t b0 = 0; b0 < s.B; b0 += kRowTile) {
        const int64_t n = std::min(kRowTile, s.B - b0);
        const at::Tensor z = at::mm(shifted_rows<scalar_t>(f, T, y, k, b0, n, margin), tile.t());
        const scalar_t* zp = z.data_ptr<scalar_t>();
        for (int64_t i = 0; i < n; ++i) {
          const acc_t l = lse[(b0 + i) * s.K + k];
          for (int64_t j = 0; j < ct; ++j) {
            const acc_t p = exp_acc<acc_t>(tau * zp[i * ct + j] - l);
            colsum[j] += p;
            row_entropy += entropy_term(p);
          }
        }
      }
      acc_t mean_entropy = 0;
      for (int64_t j = 0; j < ct; ++j) {
        const acc_t pb = colsum[j] * inv_batch;
        pbar[k * s.C + c0 + j] = pb;
        mean_entropy += entropy_term(pb);
      }
      partial[task] = row_entropy * inv_batch - mean_entropy;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_expert_loss_forward_cpu(
    const at::Tensor& f, const at::Tensor& T, const at::Tensor& y, const at::Tensor& w, double temperature,
    double margin, double entropy_weight, bool need_o) {
  const Shapes s = check_inputs(f, T, y, w);
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
    const int64_t* yp = y.data_ptr<int64_t>();
    const scalar_t tau = static_cast<scalar_t>(temperature);
    const scalar_t m = static_cast<scalar_t>(margin);
    forward_rows<scalar_t>(f, T, yp, s, tau, m, need_o, lse.data_ptr<scalar_t>(), ce.data_ptr<scalar_t>(),
                           need_o ? o.data_ptr<scalar_t>() : nullptr);
    const acc_t inv_batch = acc_t(1) / static_cast<acc_t>(s.B);
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* cep = ce.data_ptr<scalar_t>();
    acc_t total = 0;
    for (int64_t k = 0; k < s.K; ++k) {
      for (int64_t b = 0; b < s.B; ++b) total += sample_weight<acc_t>(wp, s.per_sample, b, k, s.K, inv_batch) * cep[b * s.K + k];
    }
    if (entropy) {
      std::vector<scalar_t> partial;
      forward_entropy<scalar_t>(f, T, yp, s, tau, m, lse.data_ptr<scalar_t>(), pbar.data_ptr<scalar_t>(), partial);
      acc_t ent = 0;
      for (const scalar_t v : partial) ent += v;
      total += static_cast<acc_t>(entropy_weight) * ent;
    }
    loss.fill_(static_cast<double>(total));
  });
  return {loss, lse, ce, o, pbar};
}

template <typename scalar_t>
void backward_rows(const at::Tensor& f, const at::Tensor& T, const int64_t* y, const scalar_t* w, const Shapes& s,
                   scalar_t grad, scalar_t tau, scalar_t margin, scalar_t entropy_weight, const scalar_t* lse,
                   const scalar_t* o, const scalar_t* pbar_grad, scalar_t* q, scalar_t* r) {
  using acc_t = scalar_t;
  const acc_t inv_batch = acc_t(1) / static_cast<acc_t>(s.B);
  const bool entropy = entropy_weight != scalar_t(0);
  const int64_t rows = rows_per_task(s.B, s.K);
  const int64_t row_blocks = (s.B + rows - 1) / rows;
  const scalar_t* tp = T.data_ptr<scalar_t>();
  at::parallel_for(0, s.K * row_blocks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> a(rows), pu_sum(rows);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t k = task / row_blocks;
      const int64_t b0 = (task % row_blocks) * rows;
      const int64_t n = std::min(rows, s.B - b0);
      const scalar_t* tk = tp + k * s.C * s.D;
      for (int64_t i = 0; i < n; ++i) a[i] = sample_weight<acc_t>(w, s.per_sample, b0 + i, k, s.K, inv_batch);
      if (!entropy) {
        // CE only: sum_c dz_bc T_c = grad a (o_bk - T_k[y_b]), o from the forward sweep
        for (int64_t i = 0; i < n; ++i) {
          const int64_t b = b0 + i;
          const scalar_t* ob = o + (b * s.K + k) * s.D;
          const scalar_t* ty = tk + y[b] * s.D;
          scalar_t* qb = q + (b * s.K + k) * s.D;
          const acc_t scale = grad * a[i];
          for (int64_t d = 0; d < s.D; ++d) qb[d] = scale * (ob[d] - ty[d]);
        }
        continue;
      }
      const at::Tensor g = shifted_rows<scalar_t>(f, T, y, k, b0, n, margin);
      const at::Tensor tk_t = T.select(0, k);
      // rows [0, n): A = sum_c (a p + ew p u) T_c; rows [n, 2n): O = sum_c p T_c
      at::Tensor acc = at::zeros({2 * n, s.D}, f.options());
      std::fill(pu_sum.begin(), pu_sum.end(), acc_t(0));
      for (int64_t c0 = 0; c0 < s.C; c0 += kCpuClassTile) {
        const int64_t ct = std::min<int64_t>(kCpuClassTile, s.C - c0);
        const at::Tensor tile = tk_t.narrow(0, c0, ct);
        const at::Tensor z = at::mm(g, tile.t());
        at::Tensor coef = at::empty({2 * n, ct}, f.options());
        const scalar_t* zp = z.data_ptr<scalar_t>();
        scalar_t* cp = coef.data_ptr<scalar_t>();
        for (int64_t i = 0; i < n; ++i) {
          const acc_t l = lse[(b0 + i) * s.K + k];
          for (int64_t j = 0; j < ct; ++j) {
            const acc_t p = exp_acc<acc_t>(tau * zp[i * ct + j] - l);
            const acc_t pu = p * entropy_prob_grad<acc_t>(p, pbar_grad[k * s.C + c0 + j], inv_batch);
            pu_sum[i] += pu;
            cp[i * ct + j] = a[i] * p + entropy_weight * pu;
            cp[(n + i) * ct + j] = p;
          }
        }
        acc.addmm_(coef, tile);
      }
      const scalar_t* ap = acc.data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = b0 + i;
        const scalar_t* ty = tk + y[b] * s.D;
        scalar_t* qb = q + (b * s.K + k) * s.D;
        const acc_t ew_r = entropy_weight * pu_sum[i];
        for (int64_t d = 0; d < s.D; ++d) {
          qb[d] = grad * (ap[i * s.D + d] - a[i] * ty[d] - ew_r * ap[(n + i) * s.D + d]);
        }
        if (r != nullptr) r[b * s.K + k] = pu_sum[i];
      }
    }
  });
}

template <typename scalar_t>
void backward_experts(const at::Tensor& f, const at::Tensor& T, const int64_t* y, const scalar_t* w, const Shapes& s,
                      scalar_t grad, scalar_t tau, scalar_t margin, scalar_t entropy_weight, const scalar_t* lse,
                      const scalar_t* pbar_grad, const scalar_t* q, const scalar_t* r, at::Tensor& dT) {
  using acc_t = scalar_t;
  const acc_t inv_batch = acc_t(1) / static_cast<acc_t>(s.B);
  const int64_t tiles = (s.C + kCpuClassTile - 1) / kCpuClassTile;
  at::parallel_for(0, s.K * tiles, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t k = task / tiles;
      const int64_t c0 = (task % tiles) * kCpuClassTile;
      const int64_t ct = std::min<int64_t>(kCpuClassTile, s.C - c0);
      const at::Tensor tile = T.select(0, k).narrow(0, c0, ct);
      at::Tensor out = dT.select(0, k).narrow(0, c0, ct);  // contiguous rows of dT
      out.zero_();
      scalar_t* outp = out.data_ptr<scalar_t>();
      for (int64_t b0 = 0; b0 < s.B; b0 += kRowTile) {
        const int64_t n = std::min(kRowTile, s.B - b0);
        const at::Tensor g = shifted_rows<scalar_t>(f, T, y, k, b0, n, margin);
        at::Tensor z = at::mm(g, tile.t());  // becomes dz in place
        scalar_t* zp = z.data_ptr<scalar_t>();
        for (int64_t i = 0; i < n; ++i) {
          const int64_t b = b0 + i;
          const acc_t l = lse[b * s.K + k];
          const acc_t a = sample_weight<acc_t>(w, s.per_sample, b, k, s.K, inv_batch);
          const acc_t rb = r != nullptr ? r[b * s.K + k] : acc_t(0);
          for (int64_t j = 0; j < ct; ++j) {
            const acc_t p = exp_acc<acc_t>(tau * zp[i * ct + j] - l);
            const acc_t u = entropy_weight != acc_t(0)
                                ? entropy_prob_grad<acc_t>(p, pbar_grad[k * s.C + c0 + j], inv_batch)
                                : acc_t(0);
            zp[i * ct + j] = grad * logit_grad<acc_t>(a, p, y[b] == c0 + j, entropy_weight, u, rb);
          }
        }
        out.addmm_(z.t(), g, /*beta=*/1, /*alpha=*/tau);
        if (margin != scalar_t(0)) {
          // the path through the gathered T_k[y_b]: d/dT_k[y_b] of -margin tau T_k[y_b] . sum_c dz_bc T_c
          for (int64_t i = 0; i < n; ++i) {
            const int64_t b = b0 + i;
            const int64_t j = y[b] - c0;
            if (j < 0 || j >= ct) continue;
            const scalar_t* qb = q + (b * s.K + k) * s.D;
            const acc_t scale = margin * tau;
            for (int64_t d = 0; d < s.D; ++d) outp[j * s.D + d] -= scale * qb[d];
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_expert_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& f, const at::Tensor& T, const at::Tensor& y, const at::Tensor& w,
    const at::Tensor& lse, const at::Tensor& ce, const at::Tensor& o, const at::Tensor& pbar, double temperature,
    double margin, double entropy_weight, bool need_f, bool need_T, bool need_w) {
  const Shapes s = check_inputs(f, T, y, w);
  check_labels_cpu(y, s.C);
  const bool entropy = entropy_weight != 0.0;
  TORCH_CHECK(grad.numel() == 1, "grad must hold one value (the loss is a scalar), got shape ", grad.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({s.B, s.K}) && ce.sizes() == at::IntArrayRef({s.B, s.K}),
              "lse and ce must have shape (B, K) = (", s.B, ", ", s.K, ")");
  TORCH_CHECK(lse.is_contiguous() && ce.is_contiguous(), "lse and ce must be contiguous");
  // q (and r) per row: for df, for the margin path of dT, and r for the entropy part of dT
  const bool need_rows = need_f || (need_T && (margin != 0.0 || entropy));
  if (need_rows && !entropy) {
    TORCH_CHECK(o.sizes() == at::IntArrayRef({s.B, s.K, s.D}) && o.is_contiguous(),
                "o must be the (B, K, D) softmax-weighted expert features of the forward pass (run the forward "
                "with need_o=True when f or T needs a gradient), got shape ", o.sizes());
  }
  if (entropy) {
    TORCH_CHECK(pbar.sizes() == at::IntArrayRef({s.K, s.C}) && pbar.is_contiguous(),
                "pbar must have shape (K, C) = (", s.K, ", ", s.C, ") when entropy_weight != 0, got ", pbar.sizes());
  }
  const auto options = f.options();
  at::Tensor df = need_f ? new_output({s.B, s.D}, options) : at::empty({0}, options);
  at::Tensor dT = need_T ? new_output({s.K, s.C, s.D}, options) : at::empty({0}, options);
  at::Tensor dw = need_w ? new_output(w.sizes(), options) : at::empty({0}, options);
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "multi_expert_loss_backward_cpu", [&] {
    using acc_t = scalar_t;
    const scalar_t g = grad.to(at::kCPU).to(f.scalar_type()).item<scalar_t>();
    const scalar_t tau = static_cast<scalar_t>(temperature);
    const scalar_t m = static_cast<scalar_t>(margin);
    const scalar_t ew = static_cast<scalar_t>(entropy_weight);
    const int64_t* yp = y.data_ptr<int64_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const acc_t inv_batch = acc_t(1) / static_cast<acc_t>(s.B);
    at::Tensor pbar_grad;  // h'(pbar_kc), once per class
    if (entropy && (need_rows || need_T)) {
      pbar_grad = at::empty({s.K, s.C}, options);
      const scalar_t* pb = pbar.data_ptr<scalar_t>();
      scalar_t* hp = pbar_grad.data_ptr<scalar_t>();
      for (int64_t i = 0; i < s.K * s.C; ++i) hp[i] = entropy_term_grad<acc_t>(pb[i]);
    }
    const scalar_t* hp = pbar_grad.defined() ? pbar_grad.data_ptr<scalar_t>() : nullptr;
    at::Tensor q, r;
    if (need_rows) {
      q = at::empty({s.B, s.K, s.D}, options);
      if (entropy && need_T) r = at::empty({s.B, s.K}, options);
      backward_rows<scalar_t>(f, T, yp, wp, s, g, tau, m, ew, lse.data_ptr<scalar_t>(),
                              entropy ? nullptr : o.data_ptr<scalar_t>(), hp, q.data_ptr<scalar_t>(),
                              r.defined() ? r.data_ptr<scalar_t>() : nullptr);
    }
    if (need_f) {
      const scalar_t* qp = q.data_ptr<scalar_t>();
      scalar_t* dfp = df.data_ptr<scalar_t>();
      at::parallel_for(0, s.B, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) {
          for (int64_t d = 0; d < s.D; ++d) {
            acc_t sum = 0;
            for (int64_t k = 0; k < s.K; ++k) sum += qp[(b * s.K + k) * s.D + d];
            dfp[b * s.D + d] = tau * sum;
          }
        }
      });
    }
    if (need_w) {
      const scalar_t* cep = ce.data_ptr<scalar_t>();
      scalar_t* dwp = dw.data_ptr<scalar_t>();
      if (s.per_sample) {
        for (int64_t i = 0; i < s.B * s.K; ++i) dwp[i] = g * cep[i] * inv_batch;
      } else {
        for (int64_t k = 0; k < s.K; ++k) {
          acc_t sum = 0;
          for (int64_t b = 0; b < s.B; ++b) sum += cep[b * s.K + k];
          dwp[k] = g * sum * inv_batch;
        }
      }
    }
    if (need_T) {
      backward_experts<scalar_t>(f, T, yp, wp, s, g, tau, m, ew, lse.data_ptr<scalar_t>(), hp,
                                 q.defined() ? q.data_ptr<scalar_t>() : nullptr,
                                 r.defined() ? r.data_ptr<scalar_t>() : nullptr, dT);
    }
  });
  return {df, dT, dw};
}

}  // namespace
}  // namespace multi_expert_loss

TORCH_LIBRARY_IMPL(guidg_fast, CPU, m) {
  m.impl("multi_expert_loss_forward", &multi_expert_loss::multi_expert_loss_forward_cpu);
  m.impl("multi_expert_loss_backward", &multi_expert_loss::multi_expert_loss_backward_cpu);
}

}  // namespace guidg_fast
