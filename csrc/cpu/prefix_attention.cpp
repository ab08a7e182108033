// CPU launchers of prefix_attention (shared-prefix causal attention), forward and backward.
//
// Both passes run at::parallel_for over tasks (m-chunk, k, h). Keys are processed in tiles of
// kKeyTile stored transposed, so scores are vectorised over the tile's keys; each query keeps an
// online softmax over the tiles (forward) or recomputes its probabilities from the saved lse
// (backward): no (S, P + S) score tensor exists, only one kKeyTile score row at a time. A backward
// task owns the suffix key/value gradients of its sequences outright and sums the prefix key/value
// gradients of (k, h) over its m-chunk in private accumulators; the chunk partials are reduced in a
// fixed order afterwards (deterministic, no data races).
// On x86 the hot loops are compiled twice, for AVX2+FMA and for the baseline ISA, picked at run time.
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

// ---------------------------------------------------------------------------------------- key tiles

// Keys are handled in tiles of kKeyTile, stored transposed (Dh x kKeyTile, zero padded), so a query's
// scores against a tile are Dh broadcast-FMAs over kKeyTile lanes (no horizontal sums). Tiles never
// straddle the prefix / suffix boundary: prefix tiles cover keys [0, P), suffix tiles [P, P + S).
struct Tiling {
  int64_t P, S, prefix_tiles, suffix_tiles;
  explicit Tiling(const PrefixAttentionShape& sh)
      : P(sh.P), S(sh.S), prefix_tiles((sh.P + kKeyTile - 1) / kKeyTile), suffix_tiles((sh.S + kKeyTile - 1) / kKeyTile) {}
  int64_t tiles() const { return prefix_tiles + suffix_tiles; }
  int64_t first_key(int64_t tile) const {  // global key index j of the tile's first key
    return tile < prefix_tiles ? tile * kKeyTile : P + (tile - prefix_tiles) * kKeyTile;
  }
  int64_t size(int64_t tile) const {
    return tile < prefix_tiles ? std::min(kKeyTile, P - tile * kKeyTile)
                               : std::min(kKeyTile, S - (tile - prefix_tiles) * kKeyTile);
  }
  // how many keys of the tile query s sees (0: skip the tile)
  int64_t visible(int64_t tile, int64_t s) const {
    if (tile < prefix_tiles) return size(tile);
    const int64_t first = (tile - prefix_tiles) * kKeyTile;
    return std::max<int64_t>(0, std::min(size(tile), s - first + 1));
  }
};

// dst[d * kKeyTile + t] = row t of the tile (t < n), 0 for t >= n
template <typename acc_t, typename RowFn>
GF_ALWAYS_INLINE void transpose_tile(RowFn row, int64_t n, int64_t Dh, acc_t* dst) {
  for (int64_t t = 0; t < n; ++t) {
    const auto* r = row(t);
    for (int64_t d = 0; d < Dh; ++d) dst[d * kKeyTile + t] = static_cast<acc_t>(r[d]);
  }
  for (int64_t t = n; t < kKeyTile; ++t) {
    for (int64_t d = 0; d < Dh; ++d) dst[d * kKeyTile + t] = acc_t(0);
  }
}

// sc[t] = <x, column t of the transposed tile>, for all kKeyTile lanes
template <typename acc_t>
GF_ALWAYS_INLINE void tile_dots(const acc_t* x, const acc_t* tile, int64_t Dh, acc_t* sc) {
  acc_t r[kKeyTile] = {};
  for (int64_t d = 0; d < Dh; ++d) {
    const acc_t xd = x[d];
    const acc_t* col = tile + d * kKeyTile;
#pragma omp simd
    for (int64_t t = 0; t < kKeyTile; ++t) r[t] += xd * col[t];
  }
  for (int64_t t = 0; t < kKeyTile; ++t) sc[t] = r[t];
}

// tile[d * kKeyTile + t] += x[d] * w[t]
template <typename acc_t>
GF_ALWAYS_INLINE void tile_outer_add(const acc_t* x, const acc_t* w, int64_t Dh, acc_t* tile) {
  for (int64_t d = 0; d < Dh; ++d) {
    const acc_t xd = x[d];
    acc_t* col = tile + d * kKeyTile;
#pragma omp simd
    for (int64_t t = 0; t < kKeyTile; ++t) col[t] += xd * w[t];
  }
}

// Work split shared by forward and backward: a task is (m-chunk, k, h); the prefix tiles of (k, h)
// are transposed once per task and reused by every sequence of the chunk.
struct TaskSplit {
  int64_t m_chunk, n_chunks;
  TaskSplit(const PrefixAttentionShape& sh, int64_t want_tasks) {
    const int64_t kh = std::max<int64_t>(1, sh.K * sh.H);
    const int64_t chunks = std::min<int64_t>(std::max<int64_t>(sh.M, 1), std::max<int64_t>(1, (want_tasks + kh - 1) / kh));
    m_chunk = (sh.M + chunks - 1) / chunks;
    n_chunks = (sh.M + m_chunk - 1) / m_chunk;
  }
};

// ------------------------------------------------------------------------------------------ forward

template <typename scalar_t, typename acc_t>
GF_ALWAYS_INLINE void forward_tasks(const Inputs<scalar_t>& in, scalar_t* out, acc_t* lse, int64_t m_chunk,
                                    int64_t begin, int64_t end) {
  const PrefixAttentionShape sh = in.shape;
  const int64_t Dh = sh.Dh;
  const acc_t scale = static_cast<acc_t>(in.scale);
  const Tiling tiling(sh);
  const int64_t tile_elems = Dh * kKeyTile;
  std::vector<acc_t> buffer(tiling.tiles() * tile_elems + 2 * Dh);
  acc_t* key_tiles = buffer.data();  // transposed keys: prefix tiles, then the current sequence's suffix tiles
  acc_t* q = key_tiles + tiling.tiles() * tile_elems;
  acc_t* acc = q + Dh;
  acc_t sc[kKeyTile];
  for (int64_t task = begin; task < end; ++task) {
    const int64_t h = task % sh.H;
    const int64_t k = (task / sh.H) % sh.K;
    const int64_t chunk = task / (sh.H * sh.K);
    const int64_t m_begin = chunk * m_chunk, m_end = std::min(sh.M, m_begin + m_chunk);
    for (int64_t tile = 0; tile < tiling.prefix_tiles; ++tile) {
      const int64_t j0 = tiling.first_key(tile);
      transpose_tile<acc_t>([&](int64_t t) { return key_ptr(in, k, 0, h, j0 + t); }, tiling.size(tile), Dh,
                            key_tiles + tile * tile_elems);
    }
    for (int64_t m = m_begin; m < m_end; ++m) {
      for (int64_t tile = tiling.prefix_tiles; tile < tiling.tiles(); ++tile) {
        const int64_t j0 = tiling.first_key(tile);
        transpose_tile<acc_t>([&](int64_t t) { return key_ptr(in, k, m, h, j0 + t); }, tiling.size(tile), Dh,
                              key_tiles + tile * tile_elems);
      }
      for (int64_t s = 0; s < sh.S; ++s) {
        load(q, in.q + suffix_offset(in.sq, k, m, s, h), Dh);
        std::fill(acc, acc + Dh, acc_t(0));
        OnlineSoftmax<acc_t> softmax;
        softmax.init();
        for (int64_t tile = 0; tile < tiling.tiles(); ++tile) {
          const int64_t n = tiling.visible(tile, s);
          if (n == 0) continue;
          const int64_t j0 = tiling.first_key(tile);
          tile_dots(q, key_tiles + tile * tile_elems, Dh, sc);
          acc_t tile_max = -INFINITY;
          for (int64_t t = 0; t < n; ++t) {
            sc[t] *= scale;
            tile_max = std::max(tile_max, sc[t]);
          }
          const acc_t alpha = softmax.absorb_max(tile_max);
          if (alpha != acc_t(1)) scale_inplace(acc, alpha, Dh);
          for (int64_t t = 0; t < n; ++t) axpy(acc, softmax.weight(sc[t]), value_ptr(in, k, m, h, j0 + t), Dh);
        }
        const acc_t inv = softmax.inv_sum();
        scalar_t* o = out + dense_row(sh, k, m, s, h) * Dh;
#pragma omp simd
        for (int64_t d = 0; d < Dh; ++d) o[d] = static_cast<scalar_t>(acc[d] * inv);
        lse[lse_index(sh, k, m, h, s)] = softmax.lse();
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
GF_TARGET_AVX2 void forward_tasks_avx2(const Inputs<scalar_t>& in, scalar_t* out, acc_t* lse, int64_t m_chunk,
                                       int64_t b, int64_t e) {
  forward_tasks<scalar_t, acc_t>(in, out, lse, m_chunk, b, e);
}
template <typename scalar_t, typename acc_t>
void forward_tasks_baseline(const Inputs<scalar_t>& in, scalar_t* out, acc_t* lse, int64_t m_chunk, int64_t b,
                            int64_t e) {
  forward_tasks<scalar_t, acc_t>(in, out, lse, m_chunk, b, e);
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
  const int64_t Dh = sh.Dh, P = sh.P;
  const acc_t scale = static_cast<acc_t>(in.scale);
  const Tiling tiling(sh);
  const int64_t tile_elems = Dh * kKeyTile;
  const int64_t all_tiles = tiling.tiles() * tile_elems;
  // transposed K and V tiles, and the transposed dK / dV accumulators of the same tiles (the prefix
  // ones summed over the task's m-chunk, the suffix ones over one sequence); q, dO, dq of one query
  std::vector<acc_t> buffer(4 * all_tiles + 3 * Dh);
  acc_t* key_tiles = buffer.data();
  acc_t* value_tiles = key_tiles + all_tiles;
  acc_t* dkey_tiles = value_tiles + all_tiles;
  acc_t* dvalue_tiles = dkey_tiles + all_tiles;
  acc_t* q = dvalue_tiles + all_tiles;
  acc_t* dout = q + Dh;
  acc_t* dq = dout + Dh;
  acc_t sc[kKeyTile], dp[kKeyTile], p[kKeyTile], ds[kKeyTile];
  const int64_t prefix_elems = tiling.prefix_tiles * tile_elems;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t h = task % sh.H;
    const int64_t k = (task / sh.H) % sh.K;
    const int64_t chunk = task / (sh.H * sh.K);
    const int64_t m_begin = chunk * g.m_chunk, m_end = std::min(sh.M, m_begin + g.m_chunk);
    for (int64_t tile = 0; tile < tiling.prefix_tiles; ++tile) {
      const int64_t j0 = tiling.first_key(tile), n = tiling.size(tile);
      transpose_tile<acc_t>([&](int64_t t) { return key_ptr(in, k, 0, h, j0 + t); }, n, Dh, key_tiles + tile * tile_elems);
      transpose_tile<acc_t>([&](int64_t t) { return value_ptr(in, k, 0, h, j0 + t); }, n, Dh,
                            value_tiles + tile * tile_elems);
    }
    std::fill(dkey_tiles, dkey_tiles + prefix_elems, acc_t(0));
    std::fill(dvalue_tiles, dvalue_tiles + prefix_elems, acc_t(0));
    for (int64_t m = m_begin; m < m_end; ++m) {
      for (int64_t tile = tiling.prefix_tiles; tile < tiling.tiles(); ++tile) {
        const int64_t j0 = tiling.first_key(tile), n = tiling.size(tile);
        transpose_tile<acc_t>([&](int64_t t) { return key_ptr(in, k, m, h, j0 + t); }, n, Dh,
                              key_tiles + tile * tile_elems);
        transpose_tile<acc_t>([&](int64_t t) { return value_ptr(in, k, m, h, j0 + t); }, n, Dh,
                              value_tiles + tile * tile_elems);
      }
      std::fill(dkey_tiles + prefix_elems, dkey_tiles + all_tiles, acc_t(0));
      std::fill(dvalue_tiles + prefix_elems, dvalue_tiles + all_tiles, acc_t(0));
      for (int64_t s = 0; s < sh.S; ++s) {
        const int64_t row = dense_row(sh, k, m, s, h) * Dh;
        load(q, in.q + suffix_offset(in.sq, k, m, s, h), Dh);
        load(dout, g.grad_out + row, Dh);
        const acc_t delta = dot(dout, g.out + row, Dh);
        const acc_t lse = g.lse[lse_index(sh, k, m, h, s)];
        std::fill(dq, dq + Dh, acc_t(0));
        for (int64_t tile = 0; tile < tiling.tiles(); ++tile) {
          const int64_t n = tiling.visible(tile, s);
          if (n == 0) continue;
          const int64_t j0 = tiling.first_key(tile);
          tile_dots(q, key_tiles + tile * tile_elems, Dh, sc);
          tile_dots(dout, value_tiles + tile * tile_elems, Dh, dp);
          for (int64_t t = 0; t < kKeyTile; ++t) {
            p[t] = t < n ? recompute_probability<acc_t>(scale * sc[t], lse) : acc_t(0);
            ds[t] = score_gradient<acc_t>(p[t], dp[t], delta);
          }
          for (int64_t t = 0; t < n; ++t) axpy(dq, ds[t], key_ptr(in, k, m, h, j0 + t), Dh);
          tile_outer_add(q, ds, Dh, dkey_tiles + tile * tile_elems);
          tile_outer_add(dout, p, Dh, dvalue_tiles + tile * tile_elems);
        }
        scalar_t* dq_out = g.dq + row;
#pragma omp simd
        for (int64_t d = 0; d < Dh; ++d) dq_out[d] = static_cast<scalar_t>(scale * dq[d]);
      }
      for (int64_t tile = tiling.prefix_tiles; tile < tiling.tiles(); ++tile) {
        const int64_t first = tiling.first_key(tile) - P;
        const acc_t* dkt = dkey_tiles + tile * tile_elems;
        const acc_t* dvt = dvalue_tiles + tile * tile_elems;
        for (int64_t t = 0; t < tiling.size(tile); ++t) {
          const int64_t dst = dense_row(sh, k, m, first + t, h) * Dh;
          for (int64_t d = 0; d < Dh; ++d) {
            g.dk[dst + d] = static_cast<scalar_t>(scale * dkt[d * kKeyTile + t]);
            g.dv[dst + d] = static_cast<scalar_t>(dvt[d * kKeyTile + t]);
          }
        }
      }
    }
    for (int64_t tile = 0; tile < tiling.prefix_tiles; ++tile) {
      const int64_t j0 = tiling.first_key(tile);
      const acc_t* dkt = dkey_tiles + tile * tile_elems;
      const acc_t* dvt = dvalue_tiles + tile * tile_elems;
      for (int64_t t = 0; t < tiling.size(tile); ++t) {
        const int64_t dst = (((chunk * sh.K + k) * P + j0 + t) * sh.H + h) * Dh;
        for (int64_t d = 0; d < Dh; ++d) {
          g.dkp_partial[dst + d] = scale * dkt[d * kKeyTile + t];
          g.dvp_partial[dst + d] = dvt[d * kKeyTile + t];
        }
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
  if (sh.K * sh.M * sh.H == 0 || sh.S == 0 || sh.Dh == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "prefix_attention_forward_cpu", [&] {
    using acc_t = scalar_t;  // float or double: the accumulation type is the input type
    const Inputs<scalar_t> in = make_inputs<scalar_t>(q, k, v, kp, vp, sh, scale);
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    acc_t* lse_ptr = lse.data_ptr<acc_t>();
    // about 8 sequences per task: the prefix tiles are transposed once per task
    const TaskSplit split(sh, std::max<int64_t>(1, sh.K * sh.H * ((sh.M + 7) / 8)));
    const bool avx2 = cpu_has_avx2();
    at::parallel_for(0, split.n_chunks * sh.K * sh.H, 1, [&](int64_t b, int64_t e) {
      if (avx2) forward_tasks_avx2<scalar_t, acc_t>(in, out_ptr, lse_ptr, split.m_chunk, b, e);
      else forward_tasks_baseline<scalar_t, acc_t>(in, out_ptr, lse_ptr, split.m_chunk, b, e);
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
  const TaskSplit split(sh, 4 * static_cast<int64_t>(at::get_num_threads()));
  const int64_t m_chunk = split.m_chunk, n_chunks = split.n_chunks;
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
