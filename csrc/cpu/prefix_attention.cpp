// CPU launchers of prefix_attention (shared-prefix causal attention), forward and backward.
//
// Forward: at::parallel_for over (k, m, h); each query streams its keys in tiles of kKeyTile with an
// online softmax (only a kKeyTile score buffer per query exists). Backward: parallel over
// (m-chunk, k, h): a task owns the suffix key/value gradients of its sequences outright and sums the
// prefix key/value gradients of (k, h) over its m-chunk in a private buffer; the chunk partials are
// then reduced in a fixed order (deterministic, no data races).
// Inner loops run over Dh and are vectorised (omp simd); on x86 the hot loops are compiled twice,
// for AVX2+FMA and for the baseline ISA, and picked at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "prefix_attention.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GF_HAVE_AVX2_CLONE 1
#define GF_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define GF_HAVE_AVX2_CLONE 0
#define GF_TARGET_AVX2
#endif
#if defined(__GNUC__) || defined(__clang__)
#define GF_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define GF_ALWAYS_INLINE inline
#endif

namespace guidg_fast {
namespace {

constexpr int64_t kKeyTile = 16;

template <typename acc_t, typename scalar_t>
GF_ALWAYS_INLINE acc_t dot(const acc_t* a, const scalar_t* b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * static_cast<acc_t>(b[i]);
  return s;
}

// y += a * x
template <typename acc_t, typename scalar_t>
GF_ALWAYS_INLINE void axpy(acc_t* y, acc_t a, const scalar_t* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * static_cast<acc_t>(x[i]);
}

template <typename acc_t>
GF_ALWAYS_INLINE void scale_inplace(acc_t* y, acc_t a, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

template <typename acc_t, typename scalar_t>
GF_ALWAYS_INLINE void load(acc_t* dst, const scalar_t* src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

template <typename scalar_t>
struct Inputs {
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  const scalar_t* kp;
  const scalar_t* vp;
  SuffixStrides sq, sk, sv;
  PrefixStrides skp, svp;
  PrefixAttentionShape shape;
  double scale;
};

template <typename scalar_t>
GF_ALWAYS_INLINE const scalar_t* key_ptr(const Inputs<scalar_t>& in, int64_t k, int64_t m, int64_t h, int64_t j) {
  const int64_t P = in.shape.P;
  return j < P ? in.kp + prefix_offset(in.skp, k, j, h) : in.k + suffix_offset(in.sk, k, m, j - P, h);
}
template <typename scalar_t>
GF_ALWAYS_INLINE const scalar_t* value_ptr(const Inputs<scalar_t>& in, int64_t k, int64_t m, int64_t h, int64_t j) {
  const int64_t P = in.shape.P;
  return j < P ? in.vp + prefix_offset(in.svp, k, j, h) : in.v + suffix_offset(in.sv, k, m, j - P, h);
}

// ------------------------------------------------------------------------------------------ forward

template <typename scalar_t, typename acc_t>
GF_ALWAYS_INLINE void forward_tasks(const Inputs<scalar_t>& in, scalar_t* out, acc_t* lse, int64_t begin,
                                    int64_t end) {
  const PrefixAttentionShape sh = in.shape;
  const int64_t Dh = sh.Dh;
  const acc_t scale = static_cast<acc_t>(in.scale);
  std::vector<acc_t> buffer(2 * Dh);
  acc_t* q = buffer.data();
  acc_t* acc = q + Dh;
  acc_t scores[kKeyTile];
  for (int64_t task = begin; task < end; ++task) {
    const int64_t h = task % sh.H;
    const int64_t m = (task / sh.H) % sh.M;
    const int64_t k = task / (sh.H * sh.M);
    for (int64_t s = 0; s < sh.S; ++s) {
      load(q, in.q + suffix_offset(in.sq, k, m, s, h), Dh);
      std::fill(acc, acc + Dh, acc_t(0));
      OnlineSoftmax<acc_t> softmax;
      softmax.init();
      const int64_t n_keys = prefix_attention_num_keys(s, sh.P);
      for (int64_t j0 = 0; j0 < n_keys; j0 += kKeyTile) {
        const int64_t n = std::min(kKeyTile, n_keys - j0);
        acc_t tile_max = -INFINITY;
        for (int64_t t = 0; t < n; ++t) {
          scores[t] = scale * dot(q, key_ptr(in, k, m, h, j0 + t), Dh);
          tile_max = std::max(tile_max, scores[t]);
        }
        const acc_t alpha = softmax.absorb_max(tile_max);
        scale_inplace(acc, alpha, Dh);
        for (int64_t t = 0; t < n; ++t) axpy(acc, softmax.weight(scores[t]), value_ptr(in, k, m, h, j0 + t), Dh);
      }
      const acc_t inv = softmax.inv_sum();
      scalar_t* o = out + dense_row(sh, k, m, s, h) * Dh;
#pragma omp simd
      for (int64_t d = 0; d < Dh; ++d) o[d] = static_cast<scalar_t>(acc[d] * inv);
      lse[lse_index(sh, k, m, h, s)] = softmax.lse();
    }
  }
}

template <typename scalar_t, typename acc_t>
GF_TARGET_AVX2 void forward_tasks_avx2(const Inputs<scalar_t>& in, scalar_t* out, acc_t* lse, int64_t b, int64_t e) {
  forward_tasks<scalar_t, acc_t>(in, out, lse, b, e);
}
template <typename scalar_t, typename acc_t>
void forward_tasks_baseline(const Inputs<scalar_t>& in, scalar_t* out, acc_t* lse, int64_t b, int64_t e) {
  forward_tasks<scalar_t, acc_t>(in, out, lse, b, e);
}

bool cpu_has_avx2() {
#if GF_HAVE_AVX2_CLONE
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// ----------------------------------------------------------------------------------------- backward

template <typename scalar_t, typename acc_t>
struct Grads {
  const scalar_t* grad_out;  // dense (K, M, S, H, Dh)
  const scalar_t* out;       // dense
  const acc_t* lse;          // dense (K, M, H, S)
  scalar_t* dq;              // dense
  scalar_t* dk;
  scalar_t* dv;
  acc_t* dkp_partial;  // (G, K, P, H, Dh): prefix gradients summed over one m-chunk
  acc_t* dvp_partial;
  int64_t m_chunk;
};

template <typename scalar_t, typename acc_t>
GF_ALWAYS_INLINE void backward_tasks(const Inputs<scalar_t>& in, const Grads<scalar_t, acc_t>& g, int64_t begin,
                                     int64_t end) {
  const PrefixAttentionShape sh = in.shape;
  const int64_t Dh = sh.Dh, P = sh.P, S = sh.S;
  const acc_t scale = static_cast<acc_t>(in.scale);
  // q, dO, dq of one query; prefix dK/dV of (k, h) over the chunk; suffix dK/dV of one sequence
  std::vector<acc_t> buffer((3 + 2 * P + 2 * S) * Dh);
  acc_t* q = buffer.data();
  acc_t* dout = q + Dh;
  acc_t* dq = dout + Dh;
  acc_t* dkp = dq + Dh;
  acc_t* dvp = dkp + P * Dh;
  acc_t* dks = dvp + P * Dh;
  acc_t* dvs = dks + S * Dh;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t h = task % sh.H;
    const int64_t k = (task / sh.H) % sh.K;
    const int64_t chunk = task / (sh.H * sh.K);
    const int64_t m_begin = chunk * g.m_chunk, m_end = std::min(sh.M, m_begin + g.m_chunk);
    std::fill(dkp, dkp + 2 * P * Dh, acc_t(0));
    for (int64_t m = m_begin; m < m_end; ++m) {
      std::fill(dks, dks + 2 * S * Dh, acc_t(0));
      for (int64_t s = 0; s < S; ++s) {
        const int64_t row = dense_row(sh, k, m, s, h) * Dh;
        load(q, in.q + suffix_offset(in.sq, k, m, s, h), Dh);
        load(dout, g.grad_out + row, Dh);
        const acc_t delta = dot(dout, g.out + row, Dh);
        const acc_t lse = g.lse[lse_index(sh, k, m, h, s)];
        std::fill(dq, dq + Dh, acc_t(0));
        const int64_t n_keys = prefix_attention_num_keys(s, P);
        for (int64_t j = 0; j < n_keys; ++j) {
          const scalar_t* key = key_ptr(in, k, m, h, j);
          const scalar_t* value = value_ptr(in, k, m, h, j);
          const acc_t p = recompute_probability<acc_t>(scale * dot(q, key, Dh), lse);
          const acc_t ds = score_gradient<acc_t>(p, dot(dout, value, Dh), delta);
          axpy(dq, ds, key, Dh);
          acc_t* dk_row = j < P ? dkp + j * Dh : dks + (j - P) * Dh;
          acc_t* dv_row = j < P ? dvp + j * Dh : dvs + (j - P) * Dh;
          axpy(dk_row, ds, q, Dh);
          axpy(dv_row, p, dout, Dh);
        }
        scalar_t* dq_out = g.dq + row;
#pragma omp simd
        for (int64_t d = 0; d < Dh; ++d) dq_out[d] = static_cast<scalar_t>(scale * dq[d]);
      }
      for (int64_t s = 0; s < S; ++s) {
        const int64_t row = dense_row(sh, k, m, s, h) * Dh;
        scalar_t* dk_out = g.dk + row;
        scalar_t* dv_out = g.dv + row;
#pragma omp simd
        for (int64_t d = 0; d < Dh; ++d) {
          dk_out[d] = static_cast<scalar_t>(scale * dks[s * Dh + d]);
          dv_out[d] = static_cast<scalar_t>(dvs[s * Dh + d]);
        }
      }
    }
    for (int64_t j = 0; j < P; ++j) {
      const int64_t dst = (((chunk * sh.K + k) * P + j) * sh.H + h) * Dh;
#pragma omp simd
      for (int64_t d = 0; d < Dh; ++d) {
        g.dkp_partial[dst + d] = scale * dkp[j * Dh + d];
        g.dvp_partial[dst + d] = dvp[j * Dh + d];
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
GF_TARGET_AVX2 void backward_tasks_avx2(const Inputs<scalar_t>& in, const Grads<scalar_t, acc_t>& g, int64_t b,
                                        int64_t e) {
  backward_tasks<scalar_t, acc_t>(in, g, b, e);
}
template <typename scalar_t, typename acc_t>
void backward_tasks_baseline(const Inputs<scalar_t>& in, const Grads<scalar_t, acc_t>& g, int64_t b, int64_t e) {
  backward_tasks<scalar_t, acc_t>(in, g, b, e);
}

// ----------------------------------------------------------------------------------------- launchers

// The kernels index the last (Dh) dimension with stride 1; any other stride layout is read as is.
at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

PrefixAttentionShape check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& k_prefix, const at::Tensor& v_prefix) {
  GF_CHECK_DIM(q, 5, "q");
  GF_CHECK_DIM(k, 5, "k");
  GF_CHECK_DIM(v, 5, "v");
  GF_CHECK_DIM(k_prefix, 4, "k_prefix");
  GF_CHECK_DIM(v_prefix, 4, "v_prefix");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op, ": k and v must have q's shape ", q.sizes(),
              ", got ", k.sizes(), " and ", v.sizes());
  const int64_t K = q.size(0), M = q.size(1), S = q.size(2), H = q.size(3), Dh = q.size(4), P = k_prefix.size(1);
  TORCH_CHECK(P >= 1, op, ": k_prefix must hold P >= 1 prefix keys, got shape ", k_prefix.sizes());
  TORCH_CHECK(k_prefix.sizes() == at::IntArrayRef({K, P, H, Dh}), op, ": k_prefix must have shape (", K, ", P, ", H,
              ", ", Dh, "), got ", k_prefix.sizes());
  TORCH_CHECK(v_prefix.sizes() == k_prefix.sizes(), op, ": v_prefix must have k_prefix's shape ", k_prefix.sizes(),
              ", got ", v_prefix.sizes());
  for (const at::Tensor* t : {&k, &v, &k_prefix, &v_prefix}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": all inputs must have q's dtype ", q.scalar_type(),
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), op, ": all inputs must be on q's device ", q.device());
  }
  return {K, M, S, H, Dh, P};
}

template <typename scalar_t>
Inputs<scalar_t> make_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kp,
                             const at::Tensor& vp, const PrefixAttentionShape& shape, double scale) {
  auto st5 = [](const at::Tensor& t) { return SuffixStrides{t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; };
  auto st4 = [](const at::Tensor& t) { return PrefixStrides{t.stride(0), t.stride(1), t.stride(2)}; };
  return {q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), kp.data_ptr<scalar_t>(),
          vp.data_ptr<scalar_t>(), st5(q),  st5(k), st5(v), st4(kp), st4(vp), shape, scale};
}

std::tuple<at::Tensor, at::Tensor> prefix_attention_forward_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                const at::Tensor& v_in, const at::Tensor& kp_in,
                                                                const at::Tensor& vp_in, double scale) {
  const PrefixAttentionShape sh = check_inputs("prefix_attention_forward", q_in, k_in, v_in, kp_in, vp_in);
  TORCH_CHECK(q_in.device().is_cpu(), "prefix_attention_forward (CPU kernel): q must be a CPU tensor");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kDouble,
              "prefix_attention_forward (CPU kernel): q must be float32 or float64, got ", q_in.scalar_type());
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor kp = unit_last_stride(kp_in), vp = unit_last_stride(vp_in);
  at::Tensor out = at::empty({sh.K, sh.M, sh.S, sh.H, sh.Dh}, q.options());
  at::Tensor lse = at::empty({sh.K, sh.M, sh.H, sh.S}, q.options());
  const int64_t tasks = sh.K * sh.M * sh.H;
  if (tasks == 0 || sh.S == 0 || sh.Dh == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "prefix_attention_forward_cpu", [&] {
    using acc_t = scalar_t;  // float or double: the accumulation type is the input type
    const Inputs<scalar_t> in = make_inputs<scalar_t>(q, k, v, kp, vp, sh, scale);
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    acc_t* lse_ptr = lse.data_ptr<acc_t>();
    const int64_t work = std::max<int64_t>(1, sh.S * (sh.P + sh.S) * sh.Dh);
    const int64_t grain = std::max<int64_t>(1, 16384 / work);
    const bool avx2 = cpu_has_avx2();
    at::parallel_for(0, tasks, grain, [&](int64_t b, int64_t e) {
      if (avx2) forward_tasks_avx2<scalar_t, acc_t>(in, out_ptr, lse_ptr, b, e);
      else forward_tasks_baseline<scalar_t, acc_t>(in, out_ptr, lse_ptr, b, e);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& kp_in, const at::Tensor& vp_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    double scale) {
  const PrefixAttentionShape sh = check_inputs("prefix_attention_backward", q_in, k_in, v_in, kp_in, vp_in);
  TORCH_CHECK(q_in.device().is_cpu(), "prefix_attention_backward (CPU kernel): q must be a CPU tensor");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kDouble,
              "prefix_attention_backward (CPU kernel): q must be float32 or float64, got ", q_in.scalar_type());
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "prefix_attention_backward: grad_out and out must have q's shape ", q_in.sizes(), ", got ",
              grad_out_in.sizes(), " and ", out_in.sizes());
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({sh.K, sh.M, sh.H, sh.S}),
              "prefix_attention_backward: lse must have shape (K, M, H, S) = (", sh.K, ", ", sh.M, ", ", sh.H, ", ",
              sh.S, "), got ", lse_in.sizes());
  for (const at::Tensor* t : {&grad_out_in, &out_in, &lse_in}) {
    TORCH_CHECK(t->scalar_type() == q_in.scalar_type() && t->device() == q_in.device(),
                "prefix_attention_backward: grad_out, out and lse must match q's dtype and device");
  }
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor kp = unit_last_stride(kp_in), vp = unit_last_stride(vp_in);
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor dq = at::empty_like(grad_out), dk = at::empty_like(grad_out), dv = at::empty_like(grad_out);
  at::Tensor dkp = at::empty({sh.K, sh.P, sh.H, sh.Dh}, q.options());
  at::Tensor dvp = at::empty_like(dkp);
  if (sh.K * sh.M * sh.H * sh.S * sh.Dh == 0) {
    dkp.zero_();
    dvp.zero_();
    return {dq, dk, dv, dkp, dvp};
  }
  // Enough (m-chunk, k, h) tasks to keep every thread busy; each chunk keeps its own prefix partial.
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::min<int64_t>(sh.M, std::max<int64_t>(1, (4 * threads + sh.K * sh.H - 1) / (sh.K * sh.H)));
  const int64_t m_chunk = (sh.M + chunks - 1) / chunks;
  const int64_t n_chunks = (sh.M + m_chunk - 1) / m_chunk;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "prefix_attention_backward_cpu", [&] {
    using acc_t = scalar_t;
    at::Tensor partial = n_chunks == 1 ? at::Tensor() : at::empty({2, n_chunks, sh.K, sh.P, sh.H, sh.Dh}, q.options());
    const Inputs<scalar_t> in = make_inputs<scalar_t>(q, k, v, kp, vp, sh, scale);
    Grads<scalar_t, acc_t> g{grad_out.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(),
                             lse.data_ptr<acc_t>(),
                             dq.data_ptr<scalar_t>(),
                             dk.data_ptr<scalar_t>(),
                             dv.data_ptr<scalar_t>(),
                             n_chunks == 1 ? dkp.data_ptr<acc_t>() : partial.data_ptr<acc_t>(),
                             n_chunks == 1 ? dvp.data_ptr<acc_t>() : partial.data_ptr<acc_t>() + partial.size(1) * dkp.numel(),
                             m_chunk};
    const bool avx2 = cpu_has_avx2();
    at::parallel_for(0, n_chunks * sh.K * sh.H, 1, [&](int64_t b, int64_t e) {
      if (avx2) backward_tasks_avx2<scalar_t, acc_t>(in, g, b, e);
      else backward_tasks_baseline<scalar_t, acc_t>(in, g, b, e);
    });
    if (n_chunks > 1) {
      // fixed-order sum over the chunks: the result does not depend on the thread count's timing
      const int64_t n = dkp.numel();
      const acc_t* src = partial.data_ptr<acc_t>();
      acc_t* dst_k = dkp.data_ptr<acc_t>();
      acc_t* dst_v = dvp.data_ptr<acc_t>();
      at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          acc_t sk = 0, sv = 0;
          for (int64_t c = 0; c < n_chunks; ++c) {
            sk += src[c * n + i];
            sv += src[(n_chunks + c) * n + i];
          }
          dst_k[i] = sk;
          dst_v[i] = sv;
        }
      });
    }
  });
  return {dq, dk, dv, dkp, dvp};
}

}  // namespace

TORCH_LIBRARY_IMPL(guidg_fast, CPU, m) {
  m.impl("prefix_attention_forward", &prefix_attention_forward_cpu);
  m.impl("prefix_attention_backward", &prefix_attention_backward_cpu);
}

}  // namespace guidg_fast
